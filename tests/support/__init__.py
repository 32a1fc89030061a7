"""Code shared by the test tiers: fake engine, grammar checks, engine runs, server processes, tools."""
