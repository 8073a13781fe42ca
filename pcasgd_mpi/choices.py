"""The choices of the training options, as enums that read, print and compare as their text."""

from __future__ import annotations

from enum import Enum


# ----------------------------------------------------------------------------- choices
class TextEnum(str, Enum):
    """An enum that compares, prints and formats as its text (enum.StrEnum needs Python 3.11)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Algorithm(TextEnum):
    DSGD = "dsgd"
    CLIP = "clip"
    PREDICT = "predict"
    PC_ASGD = "pc-asgd"
    PC_ASGD_PV = "pc-asgd-pv"
    PC_ASGD_AV = "pc-asgd-av"
    ALLREDUCE = "allreduce"

    @property
    def sends_gradient(self) -> bool:
        return self in (Algorithm.PREDICT, Algorithm.PC_ASGD, Algorithm.PC_ASGD_PV, Algorithm.PC_ASGD_AV)


class Mode(TextEnum):
    LOCKSTEP = "lockstep"
    ASYNC = "async"


class LamMode(TextEnum):
    FIXED = "fixed"
    ADAPTIVE = "adaptive"


class WeightRule(TextEnum):
    METROPOLIS = "metropolis"
    UNIFORM = "uniform"
    MAX_DEGREE = "max-degree"
    FILE = "file"


class Dataset(TextEnum):
    DIGITS = "digits"
    SYNTHETIC = "synthetic"
    MNIST = "mnist"
    FASHION_MNIST = "fashion-mnist"
    CIFAR10 = "cifar10"
    MNIST1D = "mnist1d"


class Model(TextEnum):
    MLP = "mlp"
    CNN = "cnn"
    RESNET20 = "resnet20"
    VGG11 = "vgg11"


class Device(TextEnum):
    CPU = "cpu"
    CUDA = "cuda"
    AUTO = "auto"


class CudaAware(TextEnum):
    AUTO = "auto"
    YES = "yes"
    NO = "no"


class Slope(TextEnum):
    UPDATE = "update"
    GRADIENT = "gradient"
    VELOCITY = "velocity"
    OWN = "own"
    DRIFT = "drift"
    MOVEMENT = "movement"

    @property
    def receiver_side(self) -> bool:
        """Made by the receiver from its own path: no slope travels with the weights."""
        return self in (Slope.OWN, Slope.MOVEMENT)


class MomentumKind(TextEnum):
    LOCAL = "local"  # torch SGD's momentum of the local gradients
    QUASI_GLOBAL = "quasi-global"  # of the whole movement, mixing included (momentum.py)


class AvMomentum(TextEnum):
    SHARED = "shared"  # pc-asgd-av mixes the momentum buffers with the neighbours' (momentum.py)
    OWN = "own"  # each rank keeps its own


class ThetaRule(TextEnum):
    FIXED = "fixed"  # --theta, the same for every stale neighbour
    STABLE = "stable"  # per neighbour, from its staleness and the mixing matrix (ALGORITHM.md)
    LINK = "link"  # lockstep: each link's disagreement predicted, one gain from the graph's loop


class Stop(TextEnum):
    FIRST = "first"
    EACH = "each"


class Balance(TextEnum):
    AUTO = "auto"  # mix in async mode, none in lockstep
    NONE = "none"
    LR = "lr"
    MIX = "mix"


class OnDiverge(TextEnum):
    ABORT = "abort"
    CONTINUE = "continue"


class Group(TextEnum):
    """Sections of `pcasgd-mpi train --help`, in this order."""

    GRAPH = "graph"
    ALGORITHM = "algorithm"
    EXECUTION = "execution"
    DATA = "data and model"
    OPTIMISATION = "optimisation"
    OUTPUT = "output"
    CHECKPOINTS = "checkpoints"


# ----------------------------------------------------------------------------- one option
