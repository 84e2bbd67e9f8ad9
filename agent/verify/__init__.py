"""The first-boot node verifier: checks and the report."""
