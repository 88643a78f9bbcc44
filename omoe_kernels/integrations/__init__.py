"""Optional integrations with other libraries. Each submodule imports its library itself, so
`import omoe_kernels` needs none of them; nothing in the core imports this package."""
