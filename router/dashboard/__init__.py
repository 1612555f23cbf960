"""The cost dashboard: server-rendered HTML with SVG charts, no script (the CSP allows only our stylesheet).

Modules: fmt (numbers), style (CSS, tier colours), charts (SVG), pages (shell, sign-in, a tenant's page),
fleet and fleet_page (the admin's views), session (sign-in sessions), routes (HTTP handlers).
"""
