"""Ray actor classes that replace OpenRLHF's PPO trainer and policy actor when --cropi.enable is set."""
