-- Break-the-glass grants are capped per hospital per hour; the cap counts
-- the hospital's own audit entries of the last hour, which this index
-- finds without reading the whole (append-only, ever-growing) trail.
CREATE INDEX audit_actor_action_idx ON audit (actor, action, at);
