-- One-time keys shared by every process on the store: a SMART client assertion's jti is
-- accepted once however many API processes serve the token URL. A claim ends at
-- expires_at (seconds since the epoch); expired ones are purged as claims arrive.
CREATE TABLE claims (
    key        TEXT    PRIMARY KEY,
    expires_at REAL    NOT NULL
) WITHOUT ROWID;
CREATE INDEX claims_expiry ON claims (expires_at);
