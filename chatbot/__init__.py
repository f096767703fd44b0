"""The chatbot around the limiter: app, agent, cluster runner and fake providers."""
