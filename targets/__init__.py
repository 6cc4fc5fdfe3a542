"""Board descriptions (one TOML file per board), read by faq_deploy.registry."""
