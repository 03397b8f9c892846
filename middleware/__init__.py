"""History policies and adapters (OpenAI client, LangGraph, debug-gym)."""
