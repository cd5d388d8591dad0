//! The catalogue's queries: uploads, committed image files, versions, and the revision racks
//! long-poll on.

use std::collections::HashSet;

use metalrack_api::images::CatalogueFile;
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::db::{query_error, Store, StoreError};
use crate::util::{now_ms, random_hex};

/// Uploads in progress at once; a new one past this fails until older ones commit or expire.
/// Each pins one manifest (up to 64 MiB) on disk and its chunk set in memory while active.
pub const UPLOADS_PENDING_MAX: i64 = 64;

/// An upload not committed within this time is forgotten and its unreferenced chunks collected.
pub const UPLOAD_LIFETIME_MS: i64 = 24 * 3600 * 1000;

#[derive(Debug, Clone)]
pub struct UploadRow {
    pub id: String,
    pub image_name: String,
    pub arch: String,
    pub kind: String,
    pub version: String,
    pub manifest_id: String,
}

#[derive(Debug, Clone)]
pub struct FileRow {
    pub kind: String,
    pub manifest_id: String,
    pub file_hash: String,
    pub file_len: i64,
    pub n_chunks: i64,
}

#[derive(Debug, Clone)]
pub struct VersionRow {
    pub id: String,
    pub version: String,
    pub created_at_ms: i64,
    pub files: Vec<FileRow>,
}

#[derive(Debug, Clone)]
pub struct ImageRow {
    pub id: String,
    pub name: String,
    pub arch: String,
    pub versions: Vec<VersionRow>,
}

#[derive(Debug)]
pub enum CommitOutcome {
    Committed,
    /// The version already has a file of this kind with different content.
    Conflict {
        file_hash: String,
    },
}

impl Store {
    pub async fn catalogue_revision(&self) -> Result<i64, StoreError> {
        sqlx::query("SELECT revision FROM catalogue_state WHERE id = 1")
            .fetch_one(self.pool())
            .await
            .and_then(|row| row.try_get(0))
            .map_err(query_error("read catalogue revision"))
    }

    /// Starts an upload, or returns the pending one for the same file and manifest so an
    /// interrupted push resumes where it stopped.
    pub async fn create_upload(
        &self,
        image_name: &str,
        arch: &str,
        kind: &str,
        version: &str,
        manifest_id: &str,
    ) -> Result<Option<String>, StoreError> {
        let mut tx = self.begin_write().await.map_err(query_error("begin create upload"))?;
        sqlx::query("DELETE FROM uploads WHERE created_at_ms < $1")
            .bind(now_ms() - UPLOAD_LIFETIME_MS)
            .execute(&mut *tx)
            .await
            .map_err(query_error("expire uploads"))?;
        let existing = sqlx::query(
            "SELECT id FROM uploads WHERE image_name = $1 AND arch = $2 AND kind = $3 AND version = $4 AND manifest_id = $5",
        )
        .bind(image_name)
        .bind(arch)
        .bind(kind)
        .bind(version)
        .bind(manifest_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(query_error("look up upload"))?;
        if let Some(row) = existing {
            let id: String = row.try_get(0).map_err(query_error("read upload"))?;
            tx.commit().await.map_err(query_error("commit create upload"))?;
            return Ok(Some(id));
        }
        let pending: i64 = sqlx::query("SELECT COUNT(*) FROM uploads")
            .fetch_one(&mut *tx)
            .await
            .and_then(|row| row.try_get(0))
            .map_err(query_error("count uploads"))?;
        if pending >= UPLOADS_PENDING_MAX {
            return Ok(None);
        }
        let id = random_hex(12);
        sqlx::query(
            "INSERT INTO uploads (id, image_name, arch, kind, version, manifest_id, created_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&id)
        .bind(image_name)
        .bind(arch)
        .bind(kind)
        .bind(version)
        .bind(manifest_id)
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(query_error("insert upload"))?;
        tx.commit().await.map_err(query_error("commit create upload"))?;
        Ok(Some(id))
    }

    pub async fn upload(&self, id: &str) -> Result<Option<UploadRow>, StoreError> {
        let row = sqlx::query("SELECT id, image_name, arch, kind, version, manifest_id FROM uploads WHERE id = $1")
            .bind(id)
            .fetch_optional(self.pool())
            .await
            .map_err(query_error("look up upload"))?;
        row.map(|row| {
            let read = query_error("read upload");
            (|| {
                Ok(UploadRow {
                    id: row.try_get(0)?,
                    image_name: row.try_get(1)?,
                    arch: row.try_get(2)?,
                    kind: row.try_get(3)?,
                    version: row.try_get(4)?,
                    manifest_id: row.try_get(5)?,
                })
            })()
            .map_err(read)
        })
        .transpose()
    }

    /// The file hash already committed for this image, version and kind, if any.
    pub async fn committed_file_hash(
        &self,
        image_name: &str,
        arch: &str,
        version: &str,
        kind: &str,
    ) -> Result<Option<String>, StoreError> {
        let row = sqlx::query(
            "SELECT f.file_hash FROM image_files f JOIN image_versions v ON v.id = f.version_id \
             JOIN images i ON i.id = v.image_id WHERE i.name = $1 AND i.arch = $2 AND v.version = $3 AND f.kind = $4",
        )
        .bind(image_name)
        .bind(arch)
        .bind(version)
        .bind(kind)
        .fetch_optional(self.pool())
        .await
        .map_err(query_error("look up committed file"))?;
        row.map(|row| row.try_get(0).map_err(query_error("read committed file"))).transpose()
    }

    /// Makes an upload part of the catalogue: image, version and file rows, and a new revision.
    pub async fn commit_upload(
        &self,
        upload: &UploadRow,
        file_hash: &str,
        file_len: u64,
        n_chunks: u64,
    ) -> Result<CommitOutcome, StoreError> {
        let now = now_ms();
        let mut tx = self.begin_write().await.map_err(query_error("begin commit upload"))?;
        let image_id: String = match sqlx::query("SELECT id FROM images WHERE name = $1 AND arch = $2")
            .bind(&upload.image_name)
            .bind(&upload.arch)
            .fetch_optional(&mut *tx)
            .await
            .map_err(query_error("look up image"))?
        {
            Some(row) => row.try_get(0).map_err(query_error("read image"))?,
            None => {
                let id = random_hex(8);
                sqlx::query("INSERT INTO images (id, name, arch, created_at_ms) VALUES ($1, $2, $3, $4)")
                    .bind(&id)
                    .bind(&upload.image_name)
                    .bind(&upload.arch)
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(query_error("insert image"))?;
                id
            }
        };
        let version_id: String = match sqlx::query("SELECT id FROM image_versions WHERE image_id = $1 AND version = $2")
            .bind(&image_id)
            .bind(&upload.version)
            .fetch_optional(&mut *tx)
            .await
            .map_err(query_error("look up version"))?
        {
            Some(row) => row.try_get(0).map_err(query_error("read version"))?,
            None => {
                let id = random_hex(8);
                sqlx::query(
                    "INSERT INTO image_versions (id, image_id, version, created_at_ms) VALUES ($1, $2, $3, $4)",
                )
                .bind(&id)
                .bind(&image_id)
                .bind(&upload.version)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(query_error("insert version"))?;
                id
            }
        };
        let existing = sqlx::query("SELECT file_hash FROM image_files WHERE version_id = $1 AND kind = $2")
            .bind(&version_id)
            .bind(&upload.kind)
            .fetch_optional(&mut *tx)
            .await
            .map_err(query_error("look up file"))?;
        if let Some(row) = existing {
            let existing_hash: String = row.try_get(0).map_err(query_error("read file"))?;
            sqlx::query("DELETE FROM uploads WHERE id = $1")
                .bind(&upload.id)
                .execute(&mut *tx)
                .await
                .map_err(query_error("delete upload"))?;
            tx.commit().await.map_err(query_error("commit upload"))?;
            return Ok(if existing_hash == file_hash {
                CommitOutcome::Committed
            } else {
                CommitOutcome::Conflict { file_hash: existing_hash }
            });
        }
        sqlx::query(
            "INSERT INTO image_files (version_id, kind, manifest_id, file_hash, file_len, n_chunks, committed_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&version_id)
        .bind(&upload.kind)
        .bind(&upload.manifest_id)
        .bind(file_hash)
        .bind(file_len as i64)
        .bind(n_chunks as i64)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(query_error("insert file"))?;
        sqlx::query("DELETE FROM uploads WHERE id = $1")
            .bind(&upload.id)
            .execute(&mut *tx)
            .await
            .map_err(query_error("delete upload"))?;
        bump_revision(&mut tx).await?;
        tx.commit().await.map_err(query_error("commit upload"))?;
        Ok(CommitOutcome::Committed)
    }

    /// Every committed file, as racks sync them.
    pub async fn catalogue_files(&self) -> Result<Vec<CatalogueFile>, StoreError> {
        let rows = sqlx::query(
            "SELECT i.name, i.arch, v.version, f.kind, f.manifest_id, f.file_hash, f.file_len, f.n_chunks \
             FROM image_files f JOIN image_versions v ON v.id = f.version_id JOIN images i ON i.id = v.image_id \
             ORDER BY i.name, i.arch, v.version, f.kind",
        )
        .fetch_all(self.pool())
        .await
        .map_err(query_error("list catalogue"))?;
        rows.iter()
            .map(|row| {
                (|| {
                    Ok(CatalogueFile {
                        image: row.try_get(0)?,
                        arch: row.try_get(1)?,
                        version: row.try_get(2)?,
                        kind: row.try_get(3)?,
                        manifest_id: row.try_get(4)?,
                        file_hash: row.try_get(5)?,
                        file_len: row.try_get::<i64, _>(6)? as u64,
                        n_chunks: row.try_get::<i64, _>(7)? as u64,
                    })
                })()
                .map_err(query_error("read catalogue"))
            })
            .collect()
    }

    /// Images with their versions and files, for the Images page and API.
    pub async fn images(&self) -> Result<Vec<ImageRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT i.id, i.name, i.arch, v.id, v.version, v.created_at_ms, f.kind, f.manifest_id, f.file_hash, \
             f.file_len, f.n_chunks FROM images i JOIN image_versions v ON v.image_id = i.id \
             JOIN image_files f ON f.version_id = v.id ORDER BY i.name, i.arch, v.created_at_ms DESC, v.version, f.kind",
        )
        .fetch_all(self.pool())
        .await
        .map_err(query_error("list images"))?;
        let mut images: Vec<ImageRow> = Vec::new();
        for row in &rows {
            let (image, version, file) = image_row(row).map_err(query_error("read image"))?;
            if images.last().map(|i| i.id != image.id).unwrap_or(true) {
                images.push(image);
            }
            let image = images.last_mut().expect("pushed above");
            if image.versions.last().map(|v| v.id != version.id).unwrap_or(true) {
                image.versions.push(version);
            }
            image.versions.last_mut().expect("pushed above").files.push(file);
        }
        Ok(images)
    }

    /// Deletes a version (and its image when it was the last). Returns `false` if there was none.
    pub async fn delete_version(&self, image_id: &str, version: &str) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await.map_err(query_error("begin delete version"))?;
        let deleted = sqlx::query("DELETE FROM image_versions WHERE image_id = $1 AND version = $2")
            .bind(image_id)
            .bind(version)
            .execute(&mut *tx)
            .await
            .map_err(query_error("delete version"))?
            .rows_affected();
        if deleted == 0 {
            return Ok(false);
        }
        // Files go with their version (ON DELETE CASCADE needs foreign keys on; say it plainly).
        sqlx::query("DELETE FROM image_files WHERE version_id NOT IN (SELECT id FROM image_versions)")
            .execute(&mut *tx)
            .await
            .map_err(query_error("delete files"))?;
        sqlx::query("DELETE FROM images WHERE id = $1 AND id NOT IN (SELECT image_id FROM image_versions)")
            .bind(image_id)
            .execute(&mut *tx)
            .await
            .map_err(query_error("delete image"))?;
        bump_revision(&mut tx).await?;
        tx.commit().await.map_err(query_error("commit delete version"))?;
        Ok(true)
    }

    /// Manifests still needed: by committed files and by uploads in progress.
    pub async fn referenced_manifest_ids(&self) -> Result<HashSet<String>, StoreError> {
        let rows = sqlx::query("SELECT manifest_id FROM image_files UNION SELECT manifest_id FROM uploads")
            .fetch_all(self.pool())
            .await
            .map_err(query_error("list manifests"))?;
        rows.iter().map(|row| row.try_get(0).map_err(query_error("read manifest id"))).collect()
    }
}

async fn bump_revision(tx: &mut sqlx::AnyConnection) -> Result<(), StoreError> {
    sqlx::query("UPDATE catalogue_state SET revision = revision + 1 WHERE id = 1")
        .execute(&mut *tx)
        .await
        .map_err(query_error("bump catalogue revision"))?;
    Ok(())
}

fn image_row(row: &AnyRow) -> Result<(ImageRow, VersionRow, FileRow), sqlx::Error> {
    Ok((
        ImageRow { id: row.try_get(0)?, name: row.try_get(1)?, arch: row.try_get(2)?, versions: Vec::new() },
        VersionRow { id: row.try_get(3)?, version: row.try_get(4)?, created_at_ms: row.try_get(5)?, files: Vec::new() },
        FileRow {
            kind: row.try_get(6)?,
            manifest_id: row.try_get(7)?,
            file_hash: row.try_get(8)?,
            file_len: row.try_get(9)?,
            n_chunks: row.try_get(10)?,
        },
    ))
}
