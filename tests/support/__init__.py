"""Test helpers shared by the test directories (fault-injecting proxy, network namespaces)."""
