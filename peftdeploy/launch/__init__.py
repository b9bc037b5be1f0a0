"""Launch: LaunchSpec (what runs), the vLLM entry point, process supervision."""
