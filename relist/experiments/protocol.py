"""The settings of the papers' studies that decide their results, as options that one file can freeze.

``relist experiment principled`` and ``relist experiment last`` read the same file (``--config
configs/protocol.yaml``): the settings both studies share at its top level (``TrainingProtocol``: seeds,
the selection criterion, patience, the weight average, λ1 and λ2, the perturbation, model sizes), and each
study's own under ``principled:`` (``PrincipledStudy``) and ``last:`` (``LastStudy``). Each experiment
takes its own section's options under their plain names (``--epochs``) and carries the other study's
section without using it, so one file serves both and a misspelt key fails in either. Every default here
is the behaviour the experiments had before these were options; the committed protocol file holds the
values the MIND studies ran with (docs/principled_mind.md, docs/last_mind.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from relist.config import option
from relist.last import OFFICIAL_STEPS, OFFSETS
from relist.principled import PERTURBATIONS
from relist.rerankers import REGISTRY

OFFSET_STEPS = ("0/0/0/0/6/7/8/9", "0/0/0/0/2/3/4/5", "0/0/0/0/20/30/40/50", "6/7/8/9/6/7/8/9")


@dataclass
class TrainingProtocol:
    """What both studies share: the seeds and how every re-ranker is trained and selected."""

    seeds: int = option(5, help="seeds of every arm; each seed trains its own models (seed, seed+1, ...)")
    seed: int = option(0, help="first seed")
    select_metric: str = option(
        "list_ce", help="re-rankers' checkpoint selection on valid (list_ce: listwise cross-entropy, or e.g. ndcg@10)"
    )
    patience: int = option(5, help="validations without improvement before a run stops")
    batch_size: int = option(128, help="lists per optimiser step")
    learning_rate: float = option(1e-3, help="Adam learning rate")
    ema_decay: float = option(
        0.95, help="re-rankers: decay per step of the weight average that is validated and kept (0: none)"
    )
    use_user: bool = option(True, help="re-rankers: personalised (user id and clicked history as features)")
    p1_weight: float = option(
        1.0, help="λ1: weight of the P1 (convergence-consistency) loss of +P1 variants and LAST's principled baseline"
    )
    p2_weight: float = option(
        1.0, help="λ2: weight of the P2 (adversarial-consistency) loss of +P2 variants and LAST's principled baseline"
    )
    perturbation: str = option(
        "adjacent", help="P2 perturbation (+P2 variants and LAST's baseline)", choices=PERTURBATIONS
    )
    cs_gradient: str = option(
        "both",
        help="CS-loss gradients through both presentations (the paper) or only the input one",
        choices=("both", "input"),
    )
    model_args: tuple[str, ...] = option(
        (),
        help="model settings, one entry per model: 'MODEL: key=value; key=value' (lists as a/b/c; "
        "MODEL a re-ranker, evaluator or generator; a model without an entry keeps its defaults)",
    )

    def __post_init__(self):
        model_settings(self.model_args)  # malformed entries fail when the options are read


@dataclass
class PrincipledStudy:
    """`relist experiment principled`'s own settings."""

    epochs: int = option(30, help="maximum epochs per run")
    sweep_weights: tuple[float, ...] = option(
        (0.1, 0.3, 3.0), help="--sweep-model: λ1 = λ2 values of the CS-weight sweep (+P1+P2)"
    )
    sweep_perturbations: tuple[str, ...] = option(
        ("pair", "k_adjacent", "window"),
        help="--sweep-model: perturbations compared with the adjacent swap (+P2)",
        choices=PERTURBATIONS,
    )


@dataclass
class LastStudy:
    """`relist experiment last`'s own settings."""

    epochs: int = option(30, help="maximum epochs of each training run (evaluator, generator, principled re-ranker)")
    principled_model: str = option(
        "prm", help="the re-ranker trained with P1+P2 as the principled baseline", choices=tuple(sorted(REGISTRY))
    )
    users: int = option(1000, help="simulated users per seed and policy")
    steps: tuple[float, ...] = option(
        OFFICIAL_STEPS,
        help="LAST parallel: one sampled candidate per step size (K = their number; best-of-K draws K pure samples)",
    )
    offsets: str = option("activations", help="where LAST's offsets go in the main comparison", choices=OFFSETS)
    scale: float = option(0.01, help="LAST: unit offset = g/||g|| * ||base|| * scale")
    gamma: float = option(0.3, help="LAST: discount of later positions' advantages")
    serial_steps: int = option(0, help="LAST serial: generate-evaluate-update rounds (0: K)")
    serial_step: float = option(6.0, help="LAST serial: step size of each offset update")
    fractions: tuple[float, ...] = option((0.01, 0.1, 1.0), help="evaluator-quality sweep: shares of the train lists")
    noise: tuple[float, ...] = option(
        (0.5, 1.0, 2.0), help="evaluator-quality sweep: std of Gaussian noise on the full evaluator's logits"
    )
    quality_users: int = option(0, help="simulated users per seed of each evaluator-quality arm (0: --users / 2)")
    offset_kinds: tuple[str, ...] = option(OFFSETS, help="offset study: where the offsets go", choices=OFFSETS)
    offset_steps: tuple[str, ...] = option(OFFSET_STEPS, help="offset study: step-size lists, each as s1/s2/.../sK")
    delays: tuple[int, ...] = option(
        (0, 500, 2000),
        help="delayed-feedback study: delays D (requests) before a list's clicks reach the online learner",
    )
    delayed_batch: int = option(50, help="delayed-feedback study: users served per batch (the learner updates between)")
    delayed_learning_rate: float = option(1e-3, help="delayed-feedback study: the online learner's Adam learning rate")
    sweep_seeds: int = option(
        0, help="run the evaluator-quality and offset studies on the first N seeds (0: all, -1: none)"
    )

    def __post_init__(self):
        for text in self.offset_steps:
            parse_steps(text)


def parse_steps(text: str) -> tuple[float, ...]:
    """``"0/0/6/7"`` -> (0.0, 0.0, 6.0, 7.0)."""
    try:
        steps = tuple(float(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"offset_steps: {text!r} is not a list of step sizes such as 0/0/0/0/6/7/8/9") from None
    if any(v < 0 for v in steps):
        raise ValueError(f"offset_steps: {text!r} has a negative step size")
    return steps


def model_settings(entries: tuple[str, ...]) -> dict[str, str]:
    """``("prm: d_model=64; n_blocks=2", ...)`` -> {"prm": "d_model=64,n_blocks=2"} (the form of
    ``--model-args`` of the training commands); each model at most once, every key checked against it."""
    from relist.rerankers import REGISTRY
    from relist.train import parse_model_args

    out: dict[str, str] = {}
    for entry in entries:
        name, colon, settings = entry.partition(":")
        name = name.strip()
        if not colon or name not in REGISTRY:
            raise ValueError(
                f"model_args: expected 'MODEL: key=value; ...' with MODEL one of {sorted(REGISTRY)}, got {entry!r}"
            )
        if name in out:
            raise ValueError(f"model_args: {name} is given more than once")
        out[name] = ",".join(s.strip() for s in settings.split(";") if s.strip())
        parse_model_args(out[name], name)  # unknown keys and wrong types fail here, naming the model
    return out
