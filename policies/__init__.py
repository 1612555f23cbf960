"""Pure routing policies: the policy-file schema, plugin protocols, plugins and the profile engine."""
