"""Authorization: SMART Backend Services, or an external issuer's bearer tokens.

- :mod:`~exportsvc.auth.app`: ``setup_auth(app, settings)``, from ``EXPORTSVC_AUTH``
  (``smart`` | ``external`` | ``off``).
- :mod:`~exportsvc.auth.middleware`: the bearer-token gate, ``check_export_types`` and
  ``check_import_types``.
- :mod:`~exportsvc.auth.oauth`: ``POST /auth/token``, ``/.well-known/smart-configuration``,
  the CapabilityStatement's ``rest.security``.
- :mod:`~exportsvc.auth.assertion`: the client assertion; :mod:`~exportsvc.auth.tokens`:
  access tokens; :mod:`~exportsvc.auth.jwks`: key sets; :mod:`~exportsvc.auth.replay`: the
  ``jti`` cache; :mod:`~exportsvc.auth.scopes`: SMART system scopes;
  :mod:`~exportsvc.auth.clients`: client registrations.

This package imports nothing on purpose: ``exportsvc.settings`` imports
:mod:`~exportsvc.auth.clients`, and the modules above import the settings.
"""
