"""Tasks: a simulated human (prompts, demonstrations, hidden gold reward, annotator). See tasks/reviews.py."""
import importlib

from ..utils import UserError


def get_task(name: str = "reviews"):
    """Import minirlhf.tasks.<name>; a task is one module with the interface documented in tasks/reviews.py."""
    try:
        return importlib.import_module(f"minirlhf.tasks.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"minirlhf.tasks.{name}":
            raise
        raise UserError(f"--task {name}: unknown task {name!r} (no module minirlhf/tasks/{name}.py)") from e
