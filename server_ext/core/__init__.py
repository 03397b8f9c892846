"""The engine-agnostic core: RoPE delta rotation, splice kernels, token CDC, the content
index and the directive planner. Adapters (embedded engine, SGLang plugin) only move bytes."""
