"""pcasgd-mpi: decentralized asynchronous training over MPI with PC-ASGD.

    import pcasgd_mpi as pc
    world = pc.init(topology="ring")
    opt = pc.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                  world=world, algorithm="pc-asgd-pv", mode="async")

Names are loaded on first use so that `import pcasgd_mpi.topology` needs neither torch nor MPI.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "init": ("world", "init"),
    "World": ("world", "World"),
    "DistributedOptimizer": ("optimizer", "DistributedOptimizer"),
    "Algorithm": ("optimizer", "Algorithm"),
    "Mode": ("optimizer", "Mode"),
    "StepInfo": ("optimizer", "StepInfo"),
    "TrainConfig": ("trainer", "TrainConfig"),
    "train": ("trainer", "run"),
}
__all__ = list(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pcasgd_mpi' has no attribute '{name}'")
    import importlib

    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value
