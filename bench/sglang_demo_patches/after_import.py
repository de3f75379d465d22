"""Run a function on a module right after it has been executed (benchmark patches only)."""
import importlib.abc
import importlib.util
import sys


class PatchAfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, targets: dict):
        self.targets = dict(targets)  # module name -> fn(module)

    def find_spec(self, fullname, path, target=None):
        fn = self.targets.get(fullname)
        if fn is None:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            fn(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def install(targets: dict) -> None:
    sys.meta_path.insert(0, PatchAfterImport(targets))
