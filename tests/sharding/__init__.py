"""The planner's plans and the sharding types."""
