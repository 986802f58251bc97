"""The studies' arms: which conversion (and, for two studies, which model variant) each arm trains.

Every arm of a study starts, per seed, from the same initial weights and sees the same batches;
what differs is only what the arm names: ``attention`` and ``options`` go to
``attnswap.convert``, ``arch`` (rarely) changes the model the arm is built from. An arm with
``reference=True`` is the one the others are compared with (paired differences per seed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Arm", "Study", "STUDIES", "study_arms"]


@dataclass(frozen=True)
class Arm:
    name: str
    attention: str
    options: dict = field(default_factory=dict)
    arch: dict = field(default_factory=dict)       # model overrides (training.DIGITS_ARCH / TEXT_ARCH)
    reference: bool = False
    match_params_of: str | None = None             # widen the MLP until params ≈ that arm's
    compare_to: str | None = None                  # baseline for paired differences (default: the reference)

    def to_dict(self) -> dict:
        return {"name": self.name, "attention": self.attention, "options": dict(self.options),
                "arch": dict(self.arch), "reference": self.reference,
                "match_params_of": self.match_params_of, "compare_to": self.compare_to}


@dataclass(frozen=True)
class Study:
    name: str
    claim: str                # what the paper says, in one sentence
    source: str
    arms: tuple

    def baseline_of(self, arm: Arm) -> str | None:
        if arm.compare_to:
            return arm.compare_to
        ref = [a.name for a in self.arms if a.reference]
        return ref[0] if ref and ref[0] != arm.name else None

    def to_dict(self) -> dict:
        return {"name": self.name, "claim": self.claim, "source": self.source,
                "arms": [a.to_dict() for a in self.arms]}


ACTIVATIONS = ("relu", "relu2", "gelu", "softplus", "identity", "relu6", "sigmoid")
ALPHAS = (0.0, 0.5, 1.0, 1.5)
SCALE_TRAIN_HEAD_DIMS = (16, 64)
SCALE_HEADS = 4


def _scale_arms(task: str) -> tuple:
    width, heads = ("embed_dim", "num_heads") if task == "digits" else ("n_embd", "n_head")
    arms = []
    for d in SCALE_TRAIN_HEAD_DIMS:
        for scaled in (True, False):
            arch = {width: SCALE_HEADS * d, heads: SCALE_HEADS, "attn_scale": "scaled" if scaled else "unscaled"}
            arms.append(Arm(f"d={d} {'1/sqrt(d)' if scaled else 'no scale'}", "softmax", {}, arch,
                            compare_to=None if scaled else f"d={d} 1/sqrt(d)"))
    return tuple(arms)


def study_arms(task: str, name: str) -> Study:
    if name == "kinds":
        return Study(name, "every attention kind trains the model to comparable quality", "attnswap",
                     (Arm("softmax", "softmax", reference=True), Arm("sigmoid", "sigmoid"),
                      Arm("relu", "relu"), Arm("sas", "sas")))
    if name == "sigmoid-bias":
        return Study(name, "sigmoid attention with b = -ln n matches softmax; without the bias (b = 0) "
                     "it trains worse, most visibly on language modelling; QK-norm stabilizes it",
                     "arXiv 2409.04431",
                     (Arm("softmax", "softmax", reference=True),
                      Arm("sigmoid b=-ln n", "sigmoid"),
                      Arm("sigmoid b=0", "sigmoid", {"sigmoid_bias": 0.0}),
                      Arm("sigmoid b=-ln n + qk-norm", "sigmoid", {"qk_norm": True})))
    if name == "relu-alpha":
        return Study(name, "phi = L^-alpha h(S): accuracy is best near alpha = 1 and drops without the "
                     "length scaling (alpha = 0)", "arXiv 2309.08586",
                     (Arm("softmax", "softmax", reference=True),)
                     + tuple(Arm(f"relu alpha={a:g}", "relu", {"alpha": a}) for a in ALPHAS))
    if name == "relu-activation":
        return Study(name, "with alpha = 1, no single h in {relu, relu2, gelu, softplus, identity, relu6, "
                     "sigmoid} is clearly best", "arXiv 2309.08586",
                     (Arm("softmax", "softmax", reference=True),)
                     + tuple(Arm(f"relu h={h}", "relu", {"activation": h, "alpha": 1.0}) for h in ACTIVATIONS))
    if name == "sas":
        return Study(name, "SAS reaches a lower validation loss than plain multi-head attention at nearly "
                     "equal parameters, and converges faster", "arXiv 2507.07694",
                     (Arm("softmax", "softmax", reference=True),
                      Arm("softmax, wider MLP (params = sas)", "softmax", match_params_of="sas"),
                      Arm("sas", "sas")))
    if name == "scale":
        return Study(name, "without the 1/sqrt(d) scale the logits' variance grows with d, softmax "
                     "saturates and its gradients vanish", "Vaswani et al. 2017, §3.2.1",
                     _scale_arms(task))
    raise ValueError(f"unknown study {name!r}; choose from {', '.join(STUDIES)}")


STUDIES = ("kinds", "sigmoid-bias", "relu-alpha", "relu-activation", "scale", "sas")
