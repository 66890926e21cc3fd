"""The miniature FuseLLM demo: real text from CPython, three tiny sources built locally."""
