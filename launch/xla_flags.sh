#!/usr/bin/env bash
# Recommended XLA / runtime settings per platform for training runs.
#
#   source launch/xla_flags.sh tpu|gpu|cpu     # exports them into this shell
#   bash launch/xla_flags.sh tpu               # prints the export lines
#
# The recommended flags come first and anything already in LIBTPU_INIT_ARGS / XLA_FLAGS is kept
# after them, so a flag set by hand wins (XLA takes the last value of a repeated flag).
# Collective/compute overlap matters most for FSDP, whose per-layer all-gathers and
# reduce-scatters would otherwise stall the step. Sourcing changes no shell options.
# The persistent compilation cache is separate: `--compilation_cache_dir=DIR` of
# psvae_jax.main or PSVAE_COMPILATION_CACHE=DIR (the launch scripts set one per run).

psvae_xla_platform="${1:-}"
case "${psvae_xla_platform}" in
  tpu)
    psvae_tpu_flags=(
      # Run collectives asynchronously, fused so that they overlap independent compute.
      --xla_tpu_enable_async_collective_fusion=true
      # ... including all-gathers (FSDP gathers each layer's weights before using them).
      --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true
      # ... and let one asynchronous collective stay in flight across several compute steps.
      --xla_tpu_enable_async_collective_fusion_multiple_steps=true
      # Overlap collectives with compute on the TensorCore.
      --xla_tpu_overlap_compute_collective_tc=true
      # Asynchronous all-gather (scheduled early, waited on late).
      --xla_enable_async_all_gather=true
      # Optimised data-parallel gradient all-reduce, also for gradients of different sizes.
      --xla_tpu_enable_data_parallel_all_reduce_opt=true
      --xla_tpu_data_parallel_opt_different_sized_ops=true
    )
    export LIBTPU_INIT_ARGS="${psvae_tpu_flags[*]}${LIBTPU_INIT_ARGS:+ ${LIBTPU_INIT_ARGS}}"
    # Only TPUs: a missing TPU is an error instead of a silent CPU run.
    export JAX_PLATFORMS="${JAX_PLATFORMS:-tpu}"
    unset psvae_tpu_flags
    ;;
  gpu)
    psvae_gpu_flags=(
      # Schedule to hide collective latency behind compute (off by default on GPU).
      --xla_gpu_enable_latency_hiding_scheduler=true
      # Give the asynchronous collective stream the highest priority so they are not starved.
      --xla_gpu_enable_highest_priority_async_stream=true
      # Combine small collectives into ~128 MiB ones: fewer NCCL launches per step.
      --xla_gpu_all_reduce_combine_threshold_bytes=134217728
      --xla_gpu_all_gather_combine_threshold_bytes=134217728
      --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728
      # Start the next layer's FSDP all-gather / previous layer's reduce-scatter early
      # (pipelined across loop iterations of scanned layers).
      --xla_gpu_enable_pipelined_all_gather=true
      --xla_gpu_enable_pipelined_reduce_scatter=true
      --xla_gpu_enable_pipelined_all_reduce=true
      # Double-buffer loop bodies (scanned layers) so communication overlaps the previous body.
      --xla_gpu_enable_while_loop_double_buffering=true
    )
    export XLA_FLAGS="${psvae_gpu_flags[*]}${XLA_FLAGS:+ ${XLA_FLAGS}}"
    # Preallocate 90% of GPU memory (jax's default is 75%) for larger batches / less remat.
    export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
    # One hardware work queue: keeps compute and NCCL kernels in issue order, which the
    # latency-hiding schedule relies on.
    export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
    # NCCL reports problems (not per-call chatter); set INFO to debug a hang.
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    # Site-specific NCCL settings are left to the cluster: NCCL_SOCKET_IFNAME (the network
    # interface, e.g. ib0 or eth0), NCCL_IB_HCA (InfiniBand adapters), NCCL_NET_GDR_LEVEL.
    unset psvae_gpu_flags
    ;;
  cpu)
    export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
    ;;
  *)
    echo "usage: source launch/xla_flags.sh tpu|gpu|cpu (got '${psvae_xla_platform}')" >&2
    # 'return' when sourced, 'exit' when run.
    # shellcheck disable=SC2317
    return 2 2> /dev/null || exit 2
    ;;
esac
unset psvae_xla_platform

if [[ "${BASH_SOURCE[0]}" == "${0}" ]]; then
  for psvae_var in LIBTPU_INIT_ARGS XLA_FLAGS XLA_PYTHON_CLIENT_MEM_FRACTION \
    CUDA_DEVICE_MAX_CONNECTIONS NCCL_DEBUG JAX_PLATFORMS; do
    if [[ -n "${!psvae_var:-}" ]]; then
      printf 'export %s="%s"\n' "${psvae_var}" "${!psvae_var}"
    fi
  done
fi
