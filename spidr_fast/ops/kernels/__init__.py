"""The fused implementation of each op, one file per stem, registered as the op's backend when `spidr_fast.ops`
is imported: `codebook` and `heads_cross_entropy` in Triton ("triton"), `attention` through the CUDA extension
built from csrc/ ("cuda"). Nothing is imported here, so that `attention` loads without triton.
"""
