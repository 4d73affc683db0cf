"""The router model, plain PyTorch: prompt layout, projector, router wrapper, tiny LM.

Submodules are imported by their users (``icl_router.model.router`` etc.); this
package itself imports nothing heavy.
"""
