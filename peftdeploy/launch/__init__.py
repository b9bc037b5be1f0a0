"""Launch: run what the plan's LaunchSpec says (the vLLM entry point, process supervision, state)."""
