"""``virtwarden api``: the HTTP API (``app``), who may call it (``auth``, ``scopes``,
``limits``), its bodies (``schemas``) and its metrics (``metrics``)."""
