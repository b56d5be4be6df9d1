from metalm_fast.ops.fused_linear_cross_entropy import fused_linear_cross_entropy  # noqa: F401
