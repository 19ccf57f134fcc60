"""What a tenant may set: the policy file schema (`schema`) and the reloading policy store with
the run-time policy the Guard applies (`store`).
"""
