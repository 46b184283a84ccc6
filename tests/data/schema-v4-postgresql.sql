-- The account store as schema version 4 created it (postgresql), for upgrade tests.
CREATE TABLE accounts (
	id SERIAL NOT NULL, 
	address VARCHAR(320) NOT NULL, 
	address_key VARCHAR(320) NOT NULL, 
	domain VARCHAR(255) NOT NULL, 
	password_hash VARCHAR(512) NOT NULL, 
	created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	updated_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	last_login_at TIMESTAMP WITH TIME ZONE, 
	migration_state VARCHAR(16), 
	source_url VARCHAR(512), 
	source_login VARCHAR(320), 
	notice_inserted_at TIMESTAMP WITH TIME ZONE, 
	served_by VARCHAR(8) NOT NULL, 
	switched_at TIMESTAMP WITH TIME ZONE, 
	hold_until TIMESTAMP WITH TIME ZONE, 
	PRIMARY KEY (id), 
	UNIQUE (address_key)
);

CREATE INDEX ix_accounts_domain ON accounts (domain);

CREATE TABLE close_requests (
	id SERIAL NOT NULL, 
	address_key VARCHAR(320) NOT NULL, 
	reason VARCHAR(200) NOT NULL, 
	created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (id)
);

CREATE INDEX ix_close_requests_created_at ON close_requests (created_at);

CREATE TABLE copy_folders (
	id SERIAL NOT NULL, 
	account_id INTEGER NOT NULL, 
	source_name VARCHAR(1024) NOT NULL, 
	dest_name VARCHAR(1024) NOT NULL, 
	uidvalidity BIGINT, 
	synced_uidnext BIGINT, 
	synced_modseq BIGINT, 
	updated_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (account_id, source_name), 
	FOREIGN KEY(account_id) REFERENCES accounts (id) ON DELETE CASCADE
);

CREATE TABLE copy_messages (
	folder_id INTEGER NOT NULL, 
	source_key VARCHAR(70) NOT NULL, 
	state VARCHAR(8) NOT NULL, 
	fingerprint VARCHAR(64) NOT NULL, 
	size BIGINT NOT NULL, 
	dest_uidvalidity BIGINT, 
	dest_uidnext BIGINT, 
	dest_uid BIGINT, 
	reason TEXT, 
	PRIMARY KEY (folder_id, source_key), 
	FOREIGN KEY(folder_id) REFERENCES copy_folders (id) ON DELETE CASCADE
);

CREATE TABLE domains (
	id SERIAL NOT NULL, 
	name VARCHAR(255) NOT NULL, 
	migrating BOOLEAN NOT NULL, 
	source_url VARCHAR(512) NOT NULL, 
	pop3_source_url VARCHAR(512), 
	cutover VARCHAR(16) NOT NULL, 
	relay_url VARCHAR(512), 
	type VARCHAR(16) NOT NULL, 
	source_user VARCHAR(255) NOT NULL, 
	subscribed_only BOOLEAN NOT NULL, 
	notice BOOLEAN NOT NULL, 
	verify_tls BOOLEAN NOT NULL, 
	source_ca TEXT, 
	created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	updated_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (name)
);

CREATE TABLE jobs (
	id SERIAL NOT NULL, 
	account_id INTEGER NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	source_host VARCHAR(255) NOT NULL, 
	not_before TIMESTAMP WITH TIME ZONE NOT NULL, 
	attempts INTEGER NOT NULL, 
	claimed_by VARCHAR(255), 
	heartbeat_at TIMESTAMP WITH TIME ZONE, 
	last_error TEXT, 
	created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	finished_at TIMESTAMP WITH TIME ZONE, 
	PRIMARY KEY (id), 
	FOREIGN KEY(account_id) REFERENCES accounts (id) ON DELETE CASCADE
);

CREATE INDEX ix_jobs_state_not_before ON jobs (state, not_before);

CREATE TABLE migrations (
	account_id INTEGER NOT NULL, 
	folders_total INTEGER NOT NULL, 
	folders_done INTEGER NOT NULL, 
	messages_total INTEGER NOT NULL, 
	messages_copied INTEGER NOT NULL, 
	messages_skipped INTEGER NOT NULL, 
	bytes_copied BIGINT NOT NULL, 
	last_error TEXT, 
	started_at TIMESTAMP WITH TIME ZONE, 
	finished_at TIMESTAMP WITH TIME ZONE, 
	last_pass_at TIMESTAMP WITH TIME ZONE, 
	PRIMARY KEY (account_id), 
	FOREIGN KEY(account_id) REFERENCES accounts (id) ON DELETE CASCADE
);

CREATE TABLE old_sessions (
	id SERIAL NOT NULL, 
	account_id INTEGER NOT NULL, 
	process VARCHAR(255) NOT NULL, 
	seen_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(account_id) REFERENCES accounts (id) ON DELETE CASCADE
);

CREATE INDEX ix_old_sessions_account_id ON old_sessions (account_id);

CREATE TABLE pop3_uidls (
	id SERIAL NOT NULL, 
	account_id INTEGER NOT NULL, 
	uidl VARCHAR(70) NOT NULL, 
	size INTEGER NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (account_id, uidl), 
	FOREIGN KEY(account_id) REFERENCES accounts (id) ON DELETE CASCADE
);

CREATE TABLE schema_info (
	id SERIAL NOT NULL, 
	version INTEGER NOT NULL, 
	PRIMARY KEY (id)
);

CREATE TABLE vault (
	account_id INTEGER NOT NULL, 
	ciphertext BYTEA NOT NULL, 
	created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (account_id), 
	FOREIGN KEY(account_id) REFERENCES accounts (id) ON DELETE CASCADE
);
