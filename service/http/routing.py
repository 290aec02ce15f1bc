"""Routes that keep resource names and custom methods apart (AIP-136: ``/v1/heads/{head}:export``).

Starlette's ``{head}`` takes any segment, ``a:export`` included, so ``DELETE
/v1/heads/a:export`` would reach ``DELETE /v1/heads/{head}`` and answer 422
about the name instead of 405 for the method. Names and ids never hold a ``:``,
so on a route without a custom method, a segment with one names a custom method.
"""

from fastapi.routing import APIRoute
from starlette.routing import Match
from starlette.types import Scope


class ResourceRoute(APIRoute):
    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match is Match.NONE or ":" in self.path:  # a custom method's route: its parameter may be 'name:alias'
            return match, child_scope
        if any(":" in str(value) for value in child_scope["path_params"].values()):
            return Match.NONE, {}
        return match, child_scope
