"""Route stage: declarative rules on tags → pipelines → destinations."""

from dicomnode.route.rules import Rule, compile_routes, select_series

__all__ = ["Rule", "compile_routes", "select_series"]
