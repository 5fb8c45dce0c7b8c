"""What `qtrain estimate` answers: the components and phases of one training step's memory, and their sums."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

GiB, MiB = 2**30, 2**20


@dataclass
class Component:
    """One line of the breakdown: bytes and the code whose memory it is."""

    name: str
    bytes: int
    kind: str  # "persistent" | "activation" | "transient" | "overhead"
    code_path: str


@dataclass
class Phase:
    """A moment of the step: the non-persistent components alive then (name -> bytes)."""

    name: str
    parts: dict[str, int]

    @property
    def bytes(self) -> int:
        return sum(self.parts.values())


@dataclass
class Breakdown:
    """Predicted memory of one training step of `recipe` on `device_type` (bytes)."""

    recipe: str
    device_type: str
    compute_dtype: str
    components: list[Component]
    phases: list[Phase]
    persistent_bytes: int
    peak_allocated: int  # torch.cuda.max_memory_allocated (CPU: the profiler's live peak)
    peak_reserved: int  # torch.cuda.max_memory_reserved
    total_on_gpu: int  # peak_reserved + CUDA context (what nvidia-smi shows)
    peak_phase: str
    peak_component: str  # the largest non-persistent component alive in the peak phase
    largest_component: str
    notes: list[str] = field(default_factory=list)
    nproc: int = 1  # the run it describes: processes (one GPU each) and whether FSDP2 shards it
    fsdp: bool = False

    def component(self, name_prefix: str) -> Component:
        return next(c for c in self.components if c.name.startswith(name_prefix))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for p, phase in zip(d["phases"], self.phases):
            p["bytes"] = phase.bytes
        return d



class Timeline:
    """Collects the phases and, for every non-persistent component, its kind and code path."""

    def __init__(self):
        self.phases: list[Phase] = []
        self.kinds: dict[str, tuple[str, str]] = {}

    def part(self, name: str, kind: str, code_path: str) -> str:
        self.kinds[name] = (kind, code_path)
        return name

    def add(self, name: str, parts: dict[str, int]) -> None:
        self.phases.append(Phase(name, {k: v for k, v in parts.items() if v}))
