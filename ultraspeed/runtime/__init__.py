"""GPU runtime: static-shape decode steps (static_step), CUDA-graph capture per bucket (graphs), kernel backend
choice (backend), and greedy loops over them (loop)."""
