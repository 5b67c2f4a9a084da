"""Optional generation backends. Each is imported only when asked for, so the main
environment never needs their dependencies: ``tether.backends.vllm`` needs the ``vllm`` package
(``make test-vllm`` builds an environment with it)."""
