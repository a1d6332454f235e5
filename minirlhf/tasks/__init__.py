"""Tasks: a simulated human (prompts, demonstrations, hidden gold reward, annotator). See tasks/reviews.py."""
import importlib
import pkgutil

from minirlhf.utils import UserError


def task_names() -> list:
    """The built-in tasks: the modules of this package (not its private ones)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get_task(name: str = "reviews"):
    """Import minirlhf.tasks.<name>; a task is one module with the interface documented in tasks/reviews.py."""
    if name not in task_names():
        raise UserError(f"--task {name}: unknown task (built-in: {', '.join(task_names())})")
    return importlib.import_module(f"minirlhf.tasks.{name}")
