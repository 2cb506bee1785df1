"""Load-test harness: direct database vs PgBouncer vs dbproxy, side by side in one run on one machine."""
