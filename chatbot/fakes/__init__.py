"""Fake providers (OpenAI, Zapier MCP) that enforce limits and referee what they saw."""
