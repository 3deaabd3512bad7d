"""xLLM and xllm-service command-line flags (C++ gflags) and a checker for planned argv.

Each table maps a flag name to (gflags type, default as text), in source order. They
were taken from the ``DEFINE_<type>(name, default, help)`` lines of the sources below;
the help texts are not copied. A default is the C++ default expression, evaluated:
``2 * 1024 * 1024`` -> "2097152", ``0.09f`` -> "0.09",
``std::numeric_limits<int32_t>::max()`` -> "2147483647".

Sources: git snapshots of github.com/jd-opensource/xllm and
github.com/jd-opensource/xllm-service, read with ``git show <commit>:<path>``.

* ``XLLM_0_9``: xllm branch release/v0.9.0 at b0328d60cf2d6c0696151f730e4847be46417bcb
  (version.txt 0.9.2). File: xllm/core/common/global_flags.cpp. No other file in that
  tree has a gflags DEFINE line. The file has 163 DEFINE lines and 162 flags, because
  enable_block_copy_kernel is defined in both arms of ``#if defined(USE_NPU)``. The
  earlier tags on that branch, read the same way, define fewer flags. Tag v0.9.0
  (145c290b45a2, version 0.9.0) lacks the 20 names in ``XLLM_NOT_IN_0_9_0``. One of
  them is etcd_namespace, which commit 87700e35 (PR #1202) added. Tag v0.9.1
  (ef1543abb6a1) lacks the 8 names in ``XLLM_NOT_IN_0_9_1``.
* ``XLLM_0_10``: xllm release/v0.10.0 at 5e814b188b89c5e937bf681178814d3667a5c96a
  (= tag v0.10.0, version.txt 0.10.0). Files: xllm/core/framework/config/*.cpp, 18 files
  with 176 DEFINE lines and 175 flags. xllm/c_api/test/utils.cpp also has DEFINE lines;
  it is a test program, so it is not read. This version adds device_id (int32, -1).
  devices is still defined but deprecated, and its default is now "".
* ``XLLM_SERVICE_0_9``: xllm-service release/v0.9.0 at
  85d7c3f42344a5de2a32aab91ed47be7e00a387c (version.txt 0.9.1). File:
  xllm_service/common/global_gflags.cpp, 32 flags. Tag v0.9.0 (c6113fed794d) lacks
  etcd_namespace (added by commit 5372485, PR #57) and readiness_check_interval_s. The
  service's main c8033e004ba2 has the same 32 flags as the release branch, although its
  version.txt says 0.9.0.

The tables describe the USE_NPU build, the one with PD KV transfer on Ascend. The
``backend=`` argument of ``table_for`` removes the NPU-only flags for other builds
(``XLLM_NPU_ONLY_*``).

Flags that come from linked libraries are not in the tables. These are gflags' own
--flagfile, --fromenv and --help*, glog's --v, --log_dir and the like, and brpc's flags.
The binaries accept them, but ``check_argv`` reports them as unknown, because the
planner does not emit them. Also, xllm's ``main()`` prints its help and returns if it
sees a literal --help or -h.

``check_argv`` follows gflags' ParseNewCommandLineFlags / SplitArgumentLocked /
FlagValue::ParseFrom (gflags/gflags src/gflags.cc). It is stricter in a few places, and
each of these is reported as an error:
* a non-bool flag without ``=value`` (gflags would take the next item as its value);
* positional items, including one after a bare bool flag (``--flag false`` sets the flag
  to true, and gflags ignores "false");
* ``--noflag=value`` (gflags ignores the value);
* a flag given twice;
* a bare ``--``.
Standard library only.
"""
from __future__ import annotations

import difflib
import re
import sys
from typing import Mapping, Sequence

FlagTable = dict[str, tuple[str, str]]

GFLAGS_TYPES = ("bool", "int32", "int64", "uint32", "uint64", "double", "string")
PROGRAMS = ("xllm", "xllm_master_serving")
#: xLLM build flavours (CMake USE_<X>, plus DCU which the sources test in #if)
BACKENDS = ("npu", "mlu", "ilu", "cuda", "musa", "dcu")

# xllm release/v0.9.0 b0328d60cf2d (0.9.2), xllm/core/common/global_flags.cpp, USE_NPU build
XLLM_0_9: dict[str, tuple[str, str]] = {
    "host": ("string", ""),
    "port": ("int32", "8010"),
    "rpc_idle_timeout_s": ("int32", "-1"),
    "rpc_channel_timeout_ms": ("int32", "-1"),
    "max_reconnect_count": ("int32", "40"),
    "num_threads": ("int32", "8"),
    "max_concurrent_requests": ("int32", "200"),
    "model_id": ("string", ""),
    "model": ("string", ""),
    "backend": ("string", ""),
    "task": ("string", "generate"),
    "devices": ("string", "npu:0"),
    "enable_customize_mla_kernel": ("bool", "false"),
    "enable_graph": ("bool", "false"),
    "enable_graph_mode_decode_no_padding": ("bool", "false"),
    "enable_prefill_piecewise_graph": ("bool", "false"),
    "enable_graph_vmm_pool": ("bool", "true"),
    "max_tokens_for_graph_mode": ("int32", "2048"),
    "acl_graph_decode_batch_size_limit": ("int32", "16"),
    "limit_image_per_prompt": ("int32", "4"),
    "num_request_handling_threads": ("int32", "4"),
    "num_response_handling_threads": ("int32", "4"),
    "block_size": ("int32", "128"),
    "max_cache_size": ("int64", "0"),
    "max_memory_utilization": ("double", "0.8"),
    "kv_cache_dtype": ("string", "auto"),
    "max_tokens_per_batch": ("int32", "10240"),
    "max_seqs_per_batch": ("int32", "1024"),
    "enable_schedule_overlap": ("bool", "false"),
    "prefill_scheduling_memory_usage_threshold": ("double", "0.95"),
    "enable_chunked_prefill": ("bool", "true"),
    "enable_prefill_sp": ("bool", "false"),
    "max_tokens_per_chunk_for_prefill": ("int32", "-1"),
    "chunked_match_frequency": ("int32", "2"),
    "use_zero_evict": ("bool", "false"),
    "max_decode_token_per_sequence": ("int32", "256"),
    "priority_strategy": ("string", "fcfs"),
    "use_mix_scheduler": ("bool", "false"),
    "enable_online_preempt_offline": ("bool", "true"),
    "aggressive_coeff": ("double", "1.0"),
    "starve_threshold": ("double", "1.0"),
    "enable_starve_prevent": ("bool", "true"),
    "request_queue_size": ("int32", "100000"),
    "dp_size": ("int32", "1"),
    "ep_size": ("int32", "1"),
    "cp_size": ("int32", "1"),
    "communication_backend": ("string", "hccl"),
    "enable_eplb": ("bool", "false"),
    "redundant_experts_num": ("int32", "1"),
    "eplb_update_interval": ("int64", "1000"),
    "eplb_update_threshold": ("double", "0.8"),
    "expert_parallel_degree": ("int32", "0"),
    "rank_tablefile": ("string", ""),
    "enable_profile_step_time": ("bool", "false"),
    "enable_profile_token_budget": ("bool", "false"),
    "enable_latency_aware_schedule": ("bool", "false"),
    "profile_max_prompt_length": ("int32", "2048"),
    "enable_profile_kv_blocks": ("bool", "true"),
    "disable_ttft_profiling": ("bool", "false"),
    "enable_forward_interruption": ("bool", "false"),
    "max_global_ttft_ms": ("int32", "2147483647"),
    "max_global_tpot_ms": ("int32", "2147483647"),
    "enable_prefix_cache": ("bool", "true"),
    "enable_cache_upload": ("bool", "false"),
    "xxh3_128bits_seed": ("uint32", "1024"),
    "master_node_addr": ("string", "127.0.0.1:19888"),
    "xtensor_master_node_addr": ("string", "127.0.0.1:19889"),
    "nnodes": ("int32", "1"),
    "node_rank": ("int32", "0"),
    "enable_shm": ("bool", "false"),
    "use_contiguous_input_buffer": ("bool", "true"),
    "enable_disagg_pd": ("bool", "false"),
    "enable_pd_ooc": ("bool", "false"),
    "disagg_pd_port": ("int32", "7777"),
    "instance_role": ("string", "DEFAULT"),
    "kv_cache_transfer_type": ("string", "LlmDataDist"),
    "kv_cache_transfer_mode": ("string", "PUSH"),
    "npu_phy_id": ("int32", "-1"),
    "transfer_listen_port": ("int32", "26000"),
    "input_shm_size": ("uint64", "1024"),
    "output_shm_size": ("uint64", "128"),
    "draft_model": ("string", ""),
    "draft_devices": ("string", "npu:0"),
    "num_speculative_tokens": ("int32", "0"),
    "speculative_algorithm": ("string", "MTP"),
    "speculative_suffix_cache_max_depth": ("int32", "64"),
    "speculative_suffix_max_spec_factor": ("double", "1.0"),
    "speculative_suffix_max_spec_offset": ("double", "0.0"),
    "speculative_suffix_min_token_prob": ("double", "0.1"),
    "speculative_suffix_max_cached_requests": ("int32", "-1"),
    "speculative_suffix_use_tree_spec": ("bool", "false"),
    "enable_opt_validate_probs": ("bool", "false"),
    "enable_atb_spec_kernel": ("bool", "false"),
    "enable_block_copy_kernel": ("bool", "true"),
    "etcd_addr": ("string", ""),
    "etcd_namespace": ("string", ""),
    "enable_service_routing": ("bool", "false"),
    "heart_beat_interval": ("double", "0.5"),
    "etcd_ttl": ("int32", "3"),
    "prefetch_timeout": ("uint32", "0"),
    "prefetch_bacth_size": ("uint32", "2"),
    "layers_wise_copy_batchs": ("uint32", "4"),
    "host_blocks_factor": ("double", "0.0"),
    "enable_kvcache_store": ("bool", "false"),
    "store_protocol": ("string", "tcp"),
    "store_master_server_address": ("string", ""),
    "store_metadata_server": ("string", ""),
    "store_local_hostname": ("string", ""),
    "enable_control_h2d_block_num": ("bool", "false"),
    "enable_multi_stream_parallel": ("bool", "false"),
    "micro_batch_num": ("int32", "1"),
    "max_requests_per_batch": ("int32", "1"),
    "enable_manual_loader": ("bool", "false"),
    "enable_xtensor": ("bool", "false"),
    "enable_rolling_load": ("bool", "false"),
    "rolling_load_num_cached_layers": ("int32", "2"),
    "rolling_load_num_rolling_slots": ("int32", "-1"),
    "phy_page_granularity_size": ("int64", "2097152"),
    "enable_beam_search_kernel": ("bool", "false"),
    "enable_rec_fast_sampler": ("bool", "true"),
    "enable_topk_sorted": ("bool", "true"),
    "output_rec_logprobs": ("bool", "false"),
    "reasoning_parser": ("string", ""),
    "tool_call_parser": ("string", ""),
    "enable_qwen3_reranker": ("bool", "false"),
    "flashinfer_workspace_buffer_size": ("int32", "134217728"),
    "enable_prefetch_weight": ("bool", "false"),
    "enable_rec_prefill_only": ("bool", "false"),
    "enable_dp_balance": ("bool", "false"),
    "random_seed": ("int32", "-1"),
    "dit_cache_policy": ("string", "TaylorSeer"),
    "dit_cache_warmup_steps": ("int64", "0"),
    "dit_cache_n_derivatives": ("int64", "3"),
    "dit_cache_skip_interval_steps": ("int64", "3"),
    "dit_cache_residual_diff_threshold": ("double", "0.09"),
    "enable_constrained_decoding": ("bool", "false"),
    "constrained_decoding_filter_path": ("string", ""),
    "enable_convert_tokens_to_item": ("bool", "false"),
    "enable_extended_item_info": ("bool", "false"),
    "dit_cache_start_steps": ("int64", "5"),
    "dit_cache_end_steps": ("int64", "5"),
    "dit_cache_start_blocks": ("int64", "5"),
    "dit_cache_end_blocks": ("int64", "5"),
    "tp_size": ("int64", "1"),
    "sp_size": ("int64", "1"),
    "cfg_size": ("int64", "1"),
    "dit_sp_communication_overlap": ("int64", "1"),
    "dit_generation_image_area_max": ("int64", "0"),
    "dit_debug_print": ("bool", "false"),
    "enable_return_mm_full_embeddings": ("bool", "false"),
    "enable_output_sku_logprobs": ("bool", "false"),
    "each_conversion_threshold": ("int32", "50"),
    "total_conversion_threshold": ("int32", "1000"),
    "use_audio_in_video": ("bool", "false"),
    "rec_worker_max_concurrency": ("uint32", "1"),
    "enable_multistream_perf_mode": ("bool", "false"),
    "npu_kernel_backend": ("string", "AUTO"),
    "enable_intralayer_addnorm": ("bool", "false"),
    "max_decode_rounds": ("int32", "0"),
    "beam_width": ("int32", "1"),
    "health_check_interval_ms": ("int32", "3000"),
    "enable_xattention_one_stage": ("bool", "false"),
}

# Names of XLLM_0_9 that the earlier tags on the branch do not define.
XLLM_NOT_IN_0_9_0: frozenset[str] = frozenset({
    "acl_graph_decode_batch_size_limit", "etcd_namespace", "constrained_decoding_filter_path",
    "enable_convert_tokens_to_item", "enable_extended_item_info", "dit_cache_start_steps",
    "dit_cache_end_steps", "dit_cache_start_blocks", "dit_cache_end_blocks", "tp_size", "sp_size",
    "cfg_size", "dit_sp_communication_overlap", "dit_generation_image_area_max", "dit_debug_print",
    "enable_return_mm_full_embeddings", "enable_output_sku_logprobs", "each_conversion_threshold",
    "total_conversion_threshold", "enable_multistream_perf_mode",
})
XLLM_NOT_IN_0_9_1: frozenset[str] = frozenset({
    "constrained_decoding_filter_path", "enable_convert_tokens_to_item",
    "enable_extended_item_info", "dit_generation_image_area_max", "enable_output_sku_logprobs",
    "each_conversion_threshold", "total_conversion_threshold", "enable_multistream_perf_mode",
})
# Defined only under #if defined(USE_NPU).
XLLM_NPU_ONLY_0_9: frozenset[str] = frozenset({"npu_kernel_backend", "enable_intralayer_addnorm"})

# xllm release/v0.10.0 5e814b188b89 (0.10.0), xllm/core/framework/config/*.cpp, USE_NPU build
XLLM_0_10: dict[str, tuple[str, str]] = {
    "enable_beam_search_kernel": ("bool", "false"),
    "beam_width": ("int32", "1"),
    "enable_block_copy_kernel": ("bool", "true"),
    "enable_topk_sorted": ("bool", "true"),
    "config_json_file": ("string", ""),
    "enable_dump_config_json": ("bool", "false"),
    "dump_config_json_file": ("string", "xllm_config.json"),
    "enable_disagg_pd": ("bool", "false"),
    "enable_pd_ooc": ("bool", "false"),
    "disagg_pd_port": ("int32", "7777"),
    "instance_role": ("string", "DEFAULT"),
    "kv_cache_transfer_type": ("string", "LlmDataDist"),
    "kv_cache_transfer_mode": ("string", "PUSH"),
    "transfer_listen_port": ("int32", "26000"),
    "kv_push_dst_rotate": ("bool", "false"),
    "master_node_addr": ("string", "127.0.0.1:19888"),
    "xtensor_master_node_addr": ("string", "127.0.0.1:19889"),
    "nnodes": ("int32", "1"),
    "node_rank": ("int32", "0"),
    "etcd_addr": ("string", ""),
    "etcd_namespace": ("string", ""),
    "enable_service_routing": ("bool", "false"),
    "heart_beat_interval": ("double", "0.5"),
    "etcd_ttl": ("int32", "3"),
    "max_requests_per_batch": ("int32", "1"),
    "dit_cache_policy": ("string", "TaylorSeer"),
    "dit_cache_warmup_steps": ("int64", "0"),
    "dit_cache_n_derivatives": ("int64", "3"),
    "dit_cache_skip_interval_steps": ("int64", "3"),
    "dit_cache_residual_diff_threshold": ("double", "0.09"),
    "dit_cache_start_steps": ("int64", "5"),
    "dit_cache_end_steps": ("int64", "5"),
    "dit_cache_start_blocks": ("int64", "5"),
    "dit_cache_end_blocks": ("int64", "5"),
    "dit_sp_communication_overlap": ("int64", "1"),
    "dit_debug_print": ("bool", "false"),
    "dit_generation_image_area_max": ("int64", "0"),
    "dit_vae_image_size": ("int64", "1048576"),
    "enable_eplb": ("bool", "false"),
    "redundant_experts_num": ("int32", "1"),
    "eplb_update_interval": ("int64", "1000"),
    "eplb_update_threshold": ("double", "0.8"),
    "expert_parallel_degree": ("int32", "0"),
    "rank_tablefile": ("string", ""),
    "enable_graph": ("bool", "false"),
    "enable_graph_mode_decode_no_padding": ("bool", "false"),
    "enable_prefill_piecewise_graph": ("bool", "false"),
    "enable_graph_vmm_pool": ("bool", "true"),
    "max_tokens_for_graph_mode": ("int32", "2048"),
    "graph_decode_batch_size_limit": ("int32", "16"),
    "enable_shm": ("bool", "false"),
    "use_contiguous_input_buffer": ("bool", "true"),
    "input_shm_size": ("uint64", "1024"),
    "output_shm_size": ("uint64", "128"),
    "random_seed": ("int32", "-1"),
    "enable_customize_mla_kernel": ("bool", "false"),
    "npu_kernel_backend": ("string", "AUTO"),
    "enable_intralayer_addnorm": ("bool", "false"),
    "enable_fused_mc2": ("int32", "-1"),
    "enable_interlayer_addnorm": ("bool", "false"),
    "enable_split_rmsnorm_rope": ("bool", "false"),
    "block_size": ("int32", "128"),
    "max_cache_size": ("int64", "0"),
    "max_memory_utilization": ("double", "0.8"),
    "kv_cache_dtype": ("string", "auto"),
    "enable_prefix_cache": ("bool", "true"),
    "xxh3_128bits_seed": ("uint32", "1024"),
    "enable_xtensor": ("bool", "false"),
    "phy_page_granularity_size": ("int64", "2097152"),
    "prefetch_timeout": ("uint32", "0"),
    "prefetch_batch_size": ("uint32", "2"),
    "layers_wise_copy_batchs": ("uint32", "4"),
    "host_blocks_factor": ("double", "0.0"),
    "enable_kvcache_store": ("bool", "false"),
    "enable_cache_upload": ("bool", "false"),
    "store_protocol": ("string", "tcp"),
    "store_master_server_address": ("string", ""),
    "store_metadata_server": ("string", ""),
    "store_local_hostname": ("string", ""),
    "enable_control_h2d_block_num": ("bool", "false"),
    "enable_manual_loader": ("bool", "false"),
    "enable_rolling_load": ("bool", "false"),
    "rolling_load_num_cached_layers": ("int32", "2"),
    "rolling_load_num_rolling_slots": ("int32", "-1"),
    "enable_prefetch_weight": ("bool", "false"),
    "model_id": ("string", ""),
    "model": ("string", ""),
    "backend": ("string", ""),
    "task": ("string", "generate"),
    "devices": ("string", ""),
    "device_id": ("int32", "-1"),
    "limit_image_per_prompt": ("int32", "8"),
    "max_encoder_cache_size": ("int64", "0"),
    "reasoning_parser": ("string", ""),
    "tool_call_parser": ("string", ""),
    "enable_qwen3_reranker": ("bool", "false"),
    "flashinfer_workspace_buffer_size": ("int32", "134217728"),
    "enable_return_mm_full_embeddings": ("bool", "false"),
    "use_audio_in_video": ("bool", "false"),
    "use_cpp_chat_template": ("bool", "true"),
    "dp_size": ("int32", "1"),
    "ep_size": ("int32", "1"),
    "cp_size": ("int32", "1"),
    "kv_split_size": ("int32", "1"),
    "tp_size": ("int64", "1"),
    "sp_size": ("int64", "1"),
    "cfg_size": ("int64", "1"),
    "communication_backend": ("string", "hccl"),
    "enable_prefill_sp": ("bool", "false"),
    "enable_mm_encoder_dp": ("bool", "false"),
    "enable_multi_stream_parallel": ("bool", "false"),
    "micro_batch_num": ("int32", "1"),
    "enable_dp_balance": ("bool", "false"),
    "enable_profile_step_time": ("bool", "false"),
    "enable_profile_token_budget": ("bool", "false"),
    "enable_latency_aware_schedule": ("bool", "false"),
    "profile_max_prompt_length": ("int32", "2048"),
    "max_global_ttft_ms": ("int32", "2147483647"),
    "max_global_tpot_ms": ("int32", "2147483647"),
    "enable_profile_kv_blocks": ("bool", "true"),
    "disable_ttft_profiling": ("bool", "false"),
    "enable_forward_interruption": ("bool", "false"),
    "enable_online_profile": ("bool", "false"),
    "profile_backend": ("string", "torch"),
    "profile_dir": ("string", ""),
    "enable_rec_fast_sampler": ("bool", "true"),
    "enable_rec_prefill_only": ("bool", "false"),
    "enable_xattention_one_stage": ("bool", "false"),
    "max_decode_rounds": ("int32", "0"),
    "enable_constrained_decoding": ("bool", "false"),
    "output_rec_logprobs": ("bool", "false"),
    "enable_convert_tokens_to_item": ("bool", "false"),
    "enable_output_sku_logprobs": ("bool", "false"),
    "enable_extended_item_info": ("bool", "false"),
    "each_conversion_threshold": ("int32", "50"),
    "total_conversion_threshold": ("int32", "1000"),
    "request_queue_size": ("int32", "100000"),
    "rec_worker_max_concurrency": ("uint32", "1"),
    "max_tokens_per_batch": ("int32", "10240"),
    "max_seqs_per_batch": ("int32", "1024"),
    "enable_schedule_overlap": ("bool", "false"),
    "prefill_scheduling_memory_usage_threshold": ("double", "0.95"),
    "enable_chunked_prefill": ("bool", "true"),
    "max_tokens_per_chunk_for_prefill": ("int32", "-1"),
    "chunked_match_frequency": ("int32", "2"),
    "use_zero_evict": ("bool", "false"),
    "max_decode_token_per_sequence": ("int32", "256"),
    "priority_strategy": ("string", "fcfs"),
    "use_mix_scheduler": ("bool", "false"),
    "enable_online_preempt_offline": ("bool", "true"),
    "aggressive_coeff": ("double", "1.0"),
    "starve_threshold": ("double", "1.0"),
    "enable_starve_prevent": ("bool", "true"),
    "host": ("string", ""),
    "port": ("int32", "8010"),
    "rpc_idle_timeout_s": ("int32", "-1"),
    "rpc_channel_timeout_ms": ("int32", "-1"),
    "max_reconnect_count": ("int32", "40"),
    "num_threads": ("int32", "8"),
    "max_concurrent_requests": ("int32", "200"),
    "num_request_handling_threads": ("int32", "4"),
    "num_response_handling_threads": ("int32", "4"),
    "health_check_interval_ms": ("int32", "3000"),
    "draft_model": ("string", ""),
    "draft_devices": ("string", ""),
    "num_speculative_tokens": ("int32", "0"),
    "speculative_algorithm": ("string", "MTP"),
    "speculative_suffix_cache_max_depth": ("int32", "64"),
    "speculative_suffix_max_spec_factor": ("double", "1.0"),
    "speculative_suffix_max_spec_offset": ("double", "0.0"),
    "speculative_suffix_min_token_prob": ("double", "0.1"),
    "speculative_suffix_max_cached_requests": ("int32", "-1"),
    "speculative_suffix_use_tree_spec": ("bool", "false"),
    "enable_opt_validate_probs": ("bool", "false"),
    "enable_atb_spec_kernel": ("bool", "false"),
}

XLLM_NPU_ONLY_0_10: frozenset[str] = frozenset({
    "enable_customize_mla_kernel", "npu_kernel_backend", "enable_intralayer_addnorm",
    "enable_fused_mc2", "enable_interlayer_addnorm", "enable_split_rmsnorm_rope",
})

# xllm-service release/v0.9.0 85d7c3f42344 (0.9.1), xllm_service/common/global_gflags.cpp
XLLM_SERVICE_0_9: dict[str, tuple[str, str]] = {
    "server_host": ("string", ""),
    "http_server_port": ("int32", "8888"),
    "http_server_idle_timeout_s": ("int32", "-1"),
    "http_server_num_threads": ("int32", "32"),
    "http_server_max_concurrency": ("int32", "128"),
    "rpc_server_port": ("int32", "8889"),
    "rpc_server_idle_timeout_s": ("int32", "-1"),
    "rpc_server_num_threads": ("int32", "32"),
    "rpc_server_max_concurrency": ("int32", "128"),
    "etcd_addr": ("string", "0.0.0.0:2379"),
    "etcd_namespace": ("string", ""),
    "xxh3_128bits_seed": ("uint32", "1024"),
    "port": ("int32", "8888"),
    "num_threads": ("int32", "32"),
    "max_concurrency": ("int32", "128"),
    "timeout_ms": ("int32", "-1"),
    "connect_timeout_ms": ("int32", "-1"),
    "listen_addr": ("string", ""),
    "idle_timeout_s": ("int32", "-1"),
    "load_balance_policy": ("string", "RR"),
    "detect_disconnected_instance_interval": ("int32", "15"),
    "instance_delete_probe_timeout_ms": ("int32", "1000"),
    "instance_delete_probe_attempts": ("int32", "2"),
    "lease_lost_heartbeat_timeout_ms": ("int32", "3000"),
    "block_size": ("int32", "128"),
    "tokenizer_path": ("string", ""),
    "enable_request_trace": ("bool", "false"),
    "target_ttft": ("int32", "1000"),
    "target_tpot": ("int32", "50"),
    "reasoning_parser": ("string", ""),
    "tool_call_parser": ("string", ""),
    "readiness_check_interval_s": ("int32", "3"),
}

# Names that xllm-service tag v0.9.0 (c6113fed794d) does not define.
XLLM_SERVICE_NOT_IN_0_9_0: frozenset[str] = frozenset({
    "etcd_namespace", "readiness_check_interval_s",
})
#: BRPC_VALIDATE_GFLAG validators in global_gflags.cpp; a failing value stops the parse.
#: (The xllm flag files of 0.9 and 0.10 register none.)
XLLM_SERVICE_0_9_VALIDATORS: dict[str, str] = {
    "target_ttft": "non_negative",  # brpc::NonNegativeInteger
    "target_tpot": "non_negative",
    "readiness_check_interval_s": "positive",  # brpc::PositiveInteger
}
_VALIDATOR_TESTS = {"non_negative": (lambda v: v >= 0, ">= 0"),
                    "positive": (lambda v: v > 0, "> 0")}


def _version(version: Sequence[int]) -> tuple[int, int, int]:
    v = tuple(version)
    if len(v) < 3 or not all(isinstance(p, int) and not isinstance(p, bool) for p in v):
        raise ValueError(f"version {version!r}: give major, minor and patch as ints, e.g. "
                         f"(0, 9, 2); the flag sets differ between patch releases")
    return v[0], v[1], v[2]


def table_for(program: str, version: Sequence[int], *, backend: str = "npu") -> FlagTable:
    """The flags that `program` of this release defines: a fresh dict name -> (type, default).

    program: "xllm" (an instance) or "xllm_master_serving" (xllm-service). version:
    (major, minor, patch). For xllm: 0.9.0 and 0.9.1 are the tags; 0.9.2 or later 0.9.x is
    the release/v0.9.0 branch head; 0.10.x is release/v0.10.0. For xllm_master_serving:
    0.9.0 is the tag; 0.9.1 or later 0.9.x is the release/v0.9.0 branch head. backend: the
    xLLM build (BACKENDS; anything but "npu" removes the NPU-only flags). Any other
    program or version raises ValueError.
    """
    major, minor, patch = _version(version)
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    shown = f"{program} {major}.{minor}.{patch}"
    if program == "xllm":
        if (major, minor) == (0, 9):
            table = dict(XLLM_0_9)
            drop = {0: XLLM_NOT_IN_0_9_0, 1: XLLM_NOT_IN_0_9_1}.get(patch, frozenset())
            if backend != "npu":
                drop = drop | XLLM_NPU_ONLY_0_9
                if patch >= 1:  # 0.9.0 had no #if around it
                    table["enable_block_copy_kernel"] = ("bool", "false")
        elif (major, minor) == (0, 10):
            table = dict(XLLM_0_10)
            drop = frozenset() if backend == "npu" else XLLM_NPU_ONLY_0_10
            if backend not in ("npu", "cuda", "dcu"):
                table["enable_block_copy_kernel"] = ("bool", "false")
        else:
            raise ValueError(f"no flag table for {shown} (known: 0.9.x, 0.10.x)")
    elif program == "xllm_master_serving":
        if (major, minor) != (0, 9):
            raise ValueError(f"no flag table for {shown} (known: 0.9.x)")
        table = dict(XLLM_SERVICE_0_9)
        drop = XLLM_SERVICE_NOT_IN_0_9_0 if patch == 0 else frozenset()
    else:
        raise ValueError(f"unknown program {program!r}: expected one of {', '.join(PROGRAMS)}")
    return {name: spec for name, spec in table.items() if name not in drop}


def validators_for(program: str, version: Sequence[int]) -> dict[str, str]:
    """The gflags validators of `program` at `version` (see table_for): name -> kind."""
    table = table_for(program, version)
    if program != "xllm_master_serving":
        return {}
    return {n: kind for n, kind in XLLM_SERVICE_0_9_VALIDATORS.items() if n in table}


# --- parsing values the way gflags' FlagValue::ParseFrom does -------------------------

_C_SPACE = " \t\n\v\f\r"  # isspace() in the C locale: strtol/strtod skip these
_DEC_INT = re.compile(f"[{_C_SPACE}]*[+-]?[0-9]+")
_HEX_INT = re.compile(r"0[xX][0-9a-fA-F]+")  # base 16 only when the text starts with 0x
_DEC_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_HEX_FLOAT = re.compile(r"[+-]?0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)"
                        r"(?:[pP][+-]?[0-9]+)?")
_SPECIAL_FLOAT = re.compile(r"[+-]?(?:inf(?:inity)?|nan(?:\([0-9A-Za-z_]*\))?)", re.IGNORECASE)
_BOOL_WORDS = {"1": True, "t": True, "true": True, "y": True, "yes": True,
               "0": False, "f": False, "false": False, "n": False, "no": False}
_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1),
               "uint32": (0, 2**32 - 1), "uint64": (0, 2**64 - 1)}


def _parse_int(ftype: str, value: str) -> tuple[int | None, str | None]:
    if ftype.startswith("u") and "-" in value:
        return None, f"{ftype} takes no negative number"
    if _HEX_INT.fullmatch(value):
        number = int(value[2:], 16)
    elif (value[:2] not in ("0x", "0X")) and _DEC_INT.fullmatch(value):
        number = int(value.lstrip(_C_SPACE), 10)
    else:
        return None, f"{value!r} is not a base-10 (or 0x hex) {ftype}"
    low, high = _INT_RANGES[ftype]
    if not low <= number <= high:
        return None, f"{value} is out of the {ftype} range [{low}, {high}]"
    return number, None


def _parse_double(value: str) -> tuple[float | None, str | None]:
    text = value.lstrip(_C_SPACE)
    if _SPECIAL_FLOAT.fullmatch(text):
        return float(text.split("(")[0]), None
    if _HEX_FLOAT.fullmatch(text):
        digits = text.lstrip("+-")[2:].split("p")[0].split("P")[0]
        try:
            number = float.fromhex(text)
        except OverflowError:
            return None, f"{value} overflows a double"
    elif _DEC_FLOAT.fullmatch(text):
        digits = text.split("e")[0].split("E")[0]
        number = float(text)
        if number in (float("inf"), float("-inf")):
            return None, f"{value} overflows a double"
    else:
        return None, f"{value!r} is not a double (strtod syntax, nothing after the number)"
    # strtod sets ERANGE when a non-zero number underflows (to 0 or a subnormal)
    if any(c not in "0.+-xX" for c in digits) and abs(number) < sys.float_info.min:
        return None, f"{value} underflows a double"
    return number, None


def _parse(ftype: str, value: str) -> tuple[object, str | None]:
    """(parsed value, None), or (None, why gflags rejects `value` for a `ftype` flag)."""
    if ftype == "string":
        return value, None
    if ftype == "bool":
        word = value.lower() if value.isascii() else value
        if word in _BOOL_WORDS:
            return _BOOL_WORDS[word], None
        return None, f"{value!r} is not a bool (true/false, 1/0, yes/no, t/f, y/n)"
    if value == "":
        return None, f"an empty value is not a {ftype}"
    if ftype == "double":
        return _parse_double(value)
    if ftype in _INT_RANGES:
        return _parse_int(ftype, value)
    raise ValueError(f"unknown gflags type {ftype!r}")


def _lookup(key: str, table: Mapping[str, tuple[str, str]]) -> str | None:
    """gflags' FindFlagLocked: exact name, else the name with '-' read as '_'."""
    if key in table:
        return key
    if "-" in key and key.replace("-", "_") in table:
        return key.replace("-", "_")
    return None


def _unknown(item: str, key: str, table: Mapping[str, tuple[str, str]]) -> str:
    if any(c.isspace() for c in key):
        hint = " (one argv item holds a space: write --name=value as a single item)"
    else:
        close = difflib.get_close_matches(key.replace("-", "_"), list(table), n=1)
        hint = f" (did you mean --{close[0]}?)" if close else ""
    return f"{item}: unknown flag --{key}{hint}"


def check_argv(argv: Sequence[str], table: Mapping[str, tuple[str, str]], *,
               validators: Mapping[str, str] | None = None) -> list[str]:
    """Errors in `argv` (the items after the program name) for a gflags program with
    `table` (see table_for). Returns one message per bad item, or [] if all are good.

    Accepted: ``--name=value`` and ``-name=value`` with a value that gflags parses for
    the flag's type, a bare ``--boolflag``, and ``--noboolflag``. `validators` (see
    validators_for) also checks the values that the program's registered validators
    would reject.
    """
    errors: list[str] = []
    given: dict[str, str] = {}
    bare_bool: str | None = None
    for index, item in enumerate(argv):
        after_bool, bare_bool = bare_bool, None
        if item == "--":
            errors.append(f"'--' ends gflags flag parsing: the {len(argv) - index - 1} "
                          f"item(s) after it would not be read as flags")
            break
        if not item.startswith("-") or item == "-":
            if after_bool is not None:
                errors.append(f"{item!r}: stray positional argument after --{after_bool}: "
                              f"gflags sets the bool to true and ignores {item!r}; write "
                              f"--{after_bool}={item}")
            else:
                errors.append(f"{item!r}: not a flag (gflags leaves positional arguments "
                              f"unread; write --name=value)")
            continue
        key, has_value, value = item[2 if item.startswith("--") else 1:].partition("=")
        name = _lookup(key, table)
        negated = False
        if name is None and key.startswith("no"):
            base = _lookup(key[2:], table)
            if base is not None:
                if table[base][0] != "bool":
                    errors.append(f"{item}: the 'no' prefix works only for bool flags; "
                                  f"--{base} is {table[base][0]}")
                    continue
                if has_value:
                    errors.append(f"{item}: gflags ignores '={value}' and sets --{base} to "
                                  f"false; write --{base}=false")
                    continue
                name, negated = base, True
        if name is None:
            errors.append(_unknown(item, key, table))
            continue
        ftype = table[name][0]
        if negated:
            parsed: object = False
        elif not has_value:
            if ftype != "bool":
                errors.append(f"{item}: --{name} ({ftype}) needs a value: write "
                              f"--{name}=VALUE (gflags would take the next item as its value)")
                continue
            bare_bool, parsed = name, True
        else:
            parsed, reason = _parse(ftype, value)
            if reason is not None:
                errors.append(f"{item}: bad value for --{name} ({ftype}): {reason}")
                continue
        kind = (validators or {}).get(name)
        if kind is not None:
            test, wanted = _VALIDATOR_TESTS[kind]
            if not test(parsed):
                errors.append(f"{item}: --{name} fails its validator (must be {wanted})")
                continue
        if name in given:
            errors.append(f"{item}: --{name} is already given as {given[name]!r}; gflags "
                          f"keeps the last one")
            continue
        given[name] = item
    return errors
