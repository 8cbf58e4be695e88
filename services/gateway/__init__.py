"""The OpenAI-compatible HTTP gateway: translates OpenAI API requests into kernel syscalls."""
