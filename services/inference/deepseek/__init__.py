"""DeepSeek-V3/R1: MLA + MoE model for the native engine, FP8 block weights, memory planning.

    model.DeepseekV3ForCausalLM     the engine's model class (registered as "DeepseekV3ForCausalLM")
    generate.greedy                 batch greedy generation without the engine (tests, checks)
    mla_triton, route_triton, norm_triton   decode kernels (engine CUDA-graph steps; docs/deepseek.md)
    fp8.quantize_checkpoint         build FP8 (e4m3, 128x128 block scales) checkpoints like R1's
    balance.plan_placement          expert placement from observed load (hot-expert replicas)
    plan.main                       `privlm plan`
See docs/deepseek.md.
"""
