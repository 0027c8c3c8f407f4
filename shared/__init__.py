"""Common code of the AEGIS services: config, message schemas, Redis keys and clients,
the database layer and logging. Holds no service logic."""
