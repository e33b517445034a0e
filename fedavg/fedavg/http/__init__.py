"""The core's HTTP face: everything of it that uses Flask.

The math, the strategies, the secure-aggregation protocol, the scenarios and
the client itself (``fedavg.client.LocalClient``) need no web framework;
these modules serve them: every app's shared checks and serving
(``service``), a client's endpoints and app (``client_app``, its page
``client_page``, its secure aggregation ``secure_routes``), and the client
host (``host_app``).
"""
