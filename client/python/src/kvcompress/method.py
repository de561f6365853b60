"""Method specifications: scorer → layer budget → head budget → reducer.

Mirrors `kvcompress.v1.MethodSpec`. Every constructor takes the documented defaults, which are
written explicitly into the request (the server treats zero as "default" anyway).

    Method.snapkv(window=64, kernel=5, pooling="avg")
    Method.snapkv(layer_budget=LayerBudget.pyramid(), head_budget=HeadBudget.adaptive())
    Method.knorm(skip_layers=[0, 1])
    Method.observed(reducer=Reducer.merge_similar(sigma="auto"))

Immutable values; safe to share between threads.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

from kvcompress._proto import kvcompress_pb2 as pb

_POOLING = {"avg": pb.POOLING_AVG, "max": pb.POOLING_MAX}
_GROUP = {"mean": pb.GROUP_REDUCTION_MEAN, "max": pb.GROUP_REDUCTION_MAX,
          "sum": pb.GROUP_REDUCTION_SUM}


def _choice(table: dict, name: str, what: str) -> int:
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"{what}: expected one of {sorted(table)}, got {name!r}") from None


class LayerBudget:
    """How the token budget is spread over layers."""

    @staticmethod
    def uniform() -> pb.LayerBudget:
        return pb.LayerBudget(uniform=pb.UniformLayerBudget())

    @staticmethod
    def pyramid(beta: float = 20.0) -> pb.LayerBudget:
        """PyramidKV."""
        return pb.LayerBudget(pyramid=pb.PyramidLayerBudget(beta=beta))

    @staticmethod
    def dynamic(r_max: float = 10.0, update_interval: int = 4) -> pb.LayerBudget:
        """DynamicKV: results of a layer are final only at the next update (or the end)."""
        return pb.LayerBudget(dynamic=pb.DynamicLayerBudget(r_max=r_max,
                                                            update_interval=update_interval))


class HeadBudget:
    """How a layer's budget is spread over KV heads."""

    @staticmethod
    def uniform() -> pb.HeadBudget:
        return pb.HeadBudget(uniform=pb.UniformHeadBudget())

    @staticmethod
    def adaptive(alpha: float = 0.2) -> pb.HeadBudget:
        """AdaKV: heads keep different counts (ragged results)."""
        return pb.HeadBudget(adaptive=pb.AdaptiveHeadBudget(alpha=alpha))


class Reducer:
    """What happens to evicted tokens."""

    @staticmethod
    def drop() -> pb.Reducer:
        return pb.Reducer(drop=pb.DropReducer())

    @staticmethod
    def merge_similar(similarity_threshold: float = 0.75,
                      sigma: Union[float, str] = 5.0,
                      protect_fraction: float = 0.0,
                      scale_values_by_set_size: bool = False) -> pb.Reducer:
        """KVMerger reconstruction. sigma="auto" uses each set's RMS distance / √2.
        protect_fraction 0 takes the server default."""
        auto = sigma == "auto"
        if not auto and not isinstance(sigma, (int, float)):
            raise ValueError(f"sigma: expected a number or 'auto', got {sigma!r}")
        return pb.Reducer(merge_similar=pb.MergeSimilarReducer(
            similarity_threshold=similarity_threshold,
            sigma=0.0 if auto else float(sigma), auto_sigma=auto,
            protect_fraction=protect_fraction,
            scale_values_by_set_size=scale_values_by_set_size))

    @staticmethod
    def merge_nearest() -> pb.Reducer:
        return pb.Reducer(merge_nearest=pb.MergeNearestReducer())


@dataclasses.dataclass(frozen=True)
class Method:
    """A compression method; `to_proto` adds the budget (keep_ratio or keep_tokens)."""

    scorer: pb.Scorer
    layer_budget: Optional[pb.LayerBudget] = None  # default uniform
    head_budget: Optional[pb.HeadBudget] = None  # default uniform
    reducer: Optional[pb.Reducer] = None  # default drop
    skip_layers: Sequence[int] = ()  # layers returned whole
    protect_sinks: int = 0  # first tokens always kept
    protect_recent: int = 0  # most recent tokens always kept

    # Scorers. Extra keyword arguments are the fields above.
    @classmethod
    def snapkv(cls, window: int = 64, kernel: int = 5, pooling: str = "avg",
               group_reduction: str = "mean", **stages) -> "Method":
        """SnapKV; needs `window` query vectors per layer (the last ones)."""
        return cls(pb.Scorer(snapkv=pb.SnapKvScorer(
            window_size=window, kernel_size=kernel,
            pooling=_choice(_POOLING, pooling, "pooling"),
            group_reduction=_choice(_GROUP, group_reduction, "group_reduction"))), **stages)

    @classmethod
    def knorm(cls, **stages) -> "Method":
        return cls(pb.Scorer(knorm=pb.KnormScorer()), **stages)

    @classmethod
    def streaming(cls, sinks: int = 4, **stages) -> "Method":
        return cls(pb.Scorer(streaming=pb.StreamingScorer(sinks=sinks)), **stages)

    @classmethod
    def observed(cls, group_reduction: str = "mean", **stages) -> "Method":
        """H2O-style: client-supplied scores [H_kv or H_q, T] fp32 per layer."""
        return cls(pb.Scorer(observed=pb.ObservedScorer(
            group_reduction=_choice(_GROUP, group_reduction, "group_reduction"))), **stages)

    @classmethod
    def tova(cls, **stages) -> "Method":
        return cls(pb.Scorer(tova=pb.TovaScorer()), **stages)

    @classmethod
    def keydiff(cls, **stages) -> "Method":
        return cls(pb.Scorer(keydiff=pb.KeyDiffScorer()), **stages)

    @property
    def scorer_name(self) -> str:
        return self.scorer.WhichOneof("kind")

    @property
    def window(self) -> int:
        """Window queries the scorer reads (0 when it needs none)."""
        kind = self.scorer_name
        if kind == "snapkv":
            return self.scorer.snapkv.window_size or 64
        if kind == "tova":
            return 1
        return 0

    def to_proto(self, keep_ratio: Optional[float] = None,
                 keep_tokens: Optional[int] = None) -> pb.MethodSpec:
        """The wire MethodSpec. Exactly one of keep_ratio (0, 1] or keep_tokens ≥ 1."""
        if (keep_ratio is None) == (keep_tokens is None):
            raise ValueError("give exactly one of keep_ratio and keep_tokens")
        spec = pb.MethodSpec(scorer=self.scorer, skip_layers=list(self.skip_layers),
                             protect_sinks=self.protect_sinks,
                             protect_recent=self.protect_recent)
        if self.layer_budget is not None:
            spec.layer_budget.CopyFrom(self.layer_budget)
        if self.head_budget is not None:
            spec.head_budget.CopyFrom(self.head_budget)
        if self.reducer is not None:
            spec.reducer.CopyFrom(self.reducer)
        if keep_ratio is not None:
            spec.keep_ratio = float(keep_ratio)
        else:
            spec.keep_tokens = int(keep_tokens)
        return spec
