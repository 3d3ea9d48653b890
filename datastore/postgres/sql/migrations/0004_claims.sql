-- One-time keys shared by every process on the store: a SMART client assertion's jti is
-- accepted once however many API processes serve the token URL. Expired claims are
-- purged as claims arrive.
CREATE TABLE claims (
    key        text        PRIMARY KEY,
    expires_at timestamptz NOT NULL
);
CREATE INDEX claims_expiry ON claims (expires_at);
