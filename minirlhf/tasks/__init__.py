"""Tasks: a simulated human (prompts, demonstrations, hidden gold reward, annotator). See tasks/reviews.py."""
import importlib


def get_task(name: str = "reviews"):
    """Import minirlhf.tasks.<name>; a task is one module with the interface documented in tasks/reviews.py."""
    try:
        return importlib.import_module(f"minirlhf.tasks.{name}")
    except ModuleNotFoundError as e:
        raise ValueError(f"unknown task {name!r} (no module minirlhf/tasks/{name}.py)") from e
