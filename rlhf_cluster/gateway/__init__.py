"""The agent gateway: an OpenAI-compatible HTTP API in front of a generation engine that records
every episode token for token, so agent code written against the `openai` client trains like the
project's own multi-turn episodes. Ray-free.

- `chat`: chat-template rendering, the tokens appended between turns.
- `replies`: the model's turn as an assistant message (tool calls, reasoning) by vLLM's parsers.
- `episode`: one episode's exact token trace (loss mask, log-probs, weight versions) and the
  check that each request extends the conversation the engine saw.
- `server`: the FastAPI app (`/v1/chat/completions`, `/v1/completions`, `/v1/models`).
- `runner`: runs a user's agent function per sample against the app and turns traces into rollouts.
- `requests`: what the app refuses as an OpenAI endpoint would (checked against `openai`'s types).
- `isolation`: agent calls in child processes (killed at the timeout, memory capped).
- `openenv`: an OpenEnv environment server as the agent (`generation.agent.environment`).
"""
