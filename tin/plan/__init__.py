"""The plan: how many updates a run makes (pure arithmetic), measured on this machine for --time_budget, and when it stops."""
