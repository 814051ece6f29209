"""`carelake sql-server`: Spark's Thrift server (HiveServer2) for BI tools, behind an authenticating proxy.

Layout: `users` (the credentials file), `policy` (what each role may read), `catalog` (lakehouse tables and the
repository's views as Spark views at the versions a statement reads), `guard` (a statement may read only those),
`audit` (ops.audit_log), `proxy` (the HiveServer2 protocol in front of the loopback Spark server), `server`
(start, discovery file, stop) and `client` (`carelake sql` through a running server). docs/sql-server.md.
"""
