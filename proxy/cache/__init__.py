"""The query result cache: rules, statement analysis, keys, stores and write invalidation."""
