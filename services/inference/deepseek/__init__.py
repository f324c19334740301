"""DeepSeek-V3/R1: MLA + MoE model for the native engine, FP8 block weights, memory planning.

    model.DeepseekV3ForCausalLM     the engine's model class (registered as "DeepseekV3ForCausalLM")
    generate.greedy                 batch greedy generation without the engine (tests, bench)
    cuda_graph.greedy_graph         the same with each decode step replayed from a CUDA graph
    fp8.quantize_checkpoint         build FP8 (e4m3, 128x128 block scales) checkpoints like R1's
    balance.plan_placement          expert placement from observed load (hot-expert replicas)
    plan.main                       `privlm plan`
See docs/deepseek.md.
"""
