"""Whether tmpdiff owns this process (its CLI does), kept apart from the ORT engine so that declaring it imports
neither torch nor onnxruntime (`tmpdiff --version`, `-h` and usage errors start fast)."""

from __future__ import annotations

process_state: dict[str, int | bool] = {}  # what share_runtime_resources has set up in this process


def own_process() -> None:
    """Declare that tmpdiff owns this process (its CLI does): runtime sessions may then share a global thread pool.

    ORT's global pool is process-wide and, once created, every session in the process must be made with
    `use_per_session_threads = False` (tmpdiff's are; a library's default-option session would fail to load),
    so a host application opts in by calling this; `tmpdiff` commands do it for themselves.
    """
    process_state["own_process"] = True
