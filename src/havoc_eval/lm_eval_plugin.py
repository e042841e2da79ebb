"""Makes the plain `lm_eval --model havoc ...` command work.

lm-evaluation-harness 0.4 has no plugin discovery for models, so `make` installs a one-line .pth
file that imports this module when Python starts. It does nothing until lm-eval's registry is
imported; then it registers `havoc` as a lazy "module:Class" entry, so programs that never use
lm-eval pay for one small import and nothing else.
"""

import importlib.abc
import importlib.util
import sys

_REGISTRY = "lm_eval.api.registry"
TARGET = "havoc_eval.lm_eval_model:HavocLM"


def register(registry_module) -> None:
    import lm_eval.models  # noqa: F401  (lm-eval loads its own models only into an empty registry)

    if "havoc" not in registry_module.model_registry:
        registry_module.model_registry.register("havoc", target=TARGET)


class _AfterRegistryImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _REGISTRY:
            return None
        sys.meta_path.remove(self)  # one use; also keeps find_spec below from finding us again
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            register(module)

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    if _REGISTRY in sys.modules:
        register(sys.modules[_REGISTRY])
    elif not any(isinstance(f, _AfterRegistryImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterRegistryImport())


install()
